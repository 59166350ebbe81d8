"""Executor side: the per-file and per-thumbnail work of a run, with no Spark and no catalog.

scan walks the roots; extract reads each original once (sha256, hashes, thumbnail); embed turns
thumbnails into vectors. The driver runs them on Spark (lookalike.driver).
"""
