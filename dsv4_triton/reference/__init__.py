"""Pure-torch FP32 oracles written from SPEC.md, one module per kernel family.

They are the ``reference`` backend of the registry and the ground truth of the tests.
"""
