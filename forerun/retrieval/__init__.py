"""Retrieval datastores for REST-style drafting: a corpus tokenized once and indexed by a suffix array."""
