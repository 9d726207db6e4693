"""`forerun serve`: an OpenAI-compatible HTTP server over the batched engine (docs/serve.md).
forerun.serve.app.create_app builds the app; its dependencies come with `pip install 'forerun[serve]'`."""
