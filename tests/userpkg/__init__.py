"""A package of one's own, as a user would write it: a model and a dataset that ntdist reaches by import path.

Not a test file: tests name `userpkg.models:small_net` and `userpkg.datasets:blobs` (tests/ is on sys.path).
"""
