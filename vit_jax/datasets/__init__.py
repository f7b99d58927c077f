"""Datasets shipped with vit_jax: the presets table and the built-in digits.

Kept import-free on purpose: `vit_jax.datasets.presets` is plain Python, and
`vit_jax.datasets.digits` (which imports tfds and registers the
`vit_jax_digits` builder) is imported only when data is read.
"""
