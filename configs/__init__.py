"""dallekit's training recipes (YAML), installed as the package data of `dallekit.configs`.

Read them with `dallekit.training.config.recipe_path("dvae/demo.yaml")`; `--config configs/dvae/demo.yaml`
finds them from any working directory.
"""
