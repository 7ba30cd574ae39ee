"""hetrun's benchmarks, one module each; `hetrun bench NAME` runs them."""
