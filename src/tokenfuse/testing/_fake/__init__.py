"""The fake upstream's implementation, split by API shape; import from :mod:`tokenfuse.testing.fake_upstream`.

``common`` owns usage, faults and the request record; one module per wire shape; ``server`` serves them all.
"""
