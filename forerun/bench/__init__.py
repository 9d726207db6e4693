"""forerun bench: forerun's methods and peer tools measured side by side (outside the core engine).

datasets -> contenders (forerun methods, peers) -> runner (interleaved, timed records) -> metrics ->
report (results.json, report.md, plots); roofline holds the physical limits. harness.run_bench ties them.
"""
