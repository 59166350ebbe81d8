"""Similarity categories: algorithm (MiniBatchKMeans + FAISS merging, incremental joins) and store
(clusters and memberships in the catalog).
"""
