"""Near-duplicates: pairs (THE pair rule), indexes (kept beside the catalog), store (pairs and groups
written in the catalog).
"""
