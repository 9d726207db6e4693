"""The batched engine: many sequences decode together over one shared KV pool.

Control plane on Python lists (sequence.py, kv_pool.py, scheduler.py), one flat forward a step
(batch.py packs it), and engine.py's step: schedule -> propose -> forward -> verify -> commit ->
observe. speculation.py is the stage between schedule and commit (drafting for the whole batch, the
goodput policy of goodput.py and the draft lengths of draft_length.py, verification); output.py
hands out what a step commits.
"""
