"""`forerun serve`: an OpenAI-compatible HTTP server over the batched engine (docs/serve.md).
forerun.serve.app.create_app builds the app; its dependencies come with `pip install 'forerun[serve]'`."""

DEFAULT_MAX_SCALING_JOBS = 4  # scaling requests run at once; each runs up to --max-num-seqs samples already
