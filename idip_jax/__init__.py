"""idip-jax: Deep Image Prior and Improved Deep Image Prior denoising in JAX/Flax."""

__version__ = "0.1.0"
