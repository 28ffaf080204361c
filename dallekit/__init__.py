"""dallekit's shared packages: data sources (`dallekit.data`), the one training loop (`dallekit.training`),
the contrastive scorer (`dallekit.scorer`) and the evaluation judges (`dallekit.evaluation`).

The two stages (`stage1_dvae`, `stage2_prior`) and the pipeline (`pipelines`) are top-level packages;
the recipes (`configs/`) install as `dallekit.configs`.
"""
