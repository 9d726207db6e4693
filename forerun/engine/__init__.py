"""The batched engine: many sequences decode together over one shared KV pool.

Control plane on Python lists (sequence.py, kv_pool.py, scheduler.py, goodput.py), one flat forward
a step (batch.py packs it), and engine.py's step: schedule -> propose -> forward -> verify -> commit.
"""
