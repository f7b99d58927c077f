"""Installs vit_jax: Vision Transformers in JAX/Flax."""

import setuptools

INSTALL_REQUIRES = [
    'jax>=0.10.2',
    'jaxlib>=0.10.2',
    'flax>=0.12.8',
    'optax',
    'orbax-checkpoint',
    'ml-collections',
    'numpy',
    'tensorflow-cpu',
    'tensorflow-datasets',
    # tfds imports it for builders defined inside a package but does not
    # declare it.
    'importlib_resources',
    # Ships the handwritten digits behind the built-in offline dataset.
    'scikit-learn',
    'safetensors',
    'matplotlib',
    'pillow',
]

# The numerical peers. torch and torchvision are pinned as a pair: other pairs
# break `import timm`, and an unpinned torch pulls a multi-GB CUDA build.
TEST_REQUIRES = [
    'pytest',
    'pytest-xdist',  # the suite runs on 2 workers: 13 vs 18 min on 2 cores
    'filelock',  # JAX locks the tests' shared compilation cache with it
    'torch==2.14.1',
    'torchvision==0.29.1',
    'timm',
    'transformers',
]

setuptools.setup(
    name='vit_jax',
    version='0.1.0',
    description='Vision Transformers in JAX/Flax: models, training, checkpoints.',
    packages=setuptools.find_packages(include=['vit_jax', 'vit_jax.*']),
    # The C/C++ sources are compiled on first use (vit_jax/native_build.py).
    package_data={'vit_jax': ['datasets/*.txt', 'datasets/*.md', '*.c',
                              'models/*.cc']},
    python_requires='>=3.10',
    install_requires=INSTALL_REQUIRES,
    extras_require={'test': TEST_REQUIRES},
)
