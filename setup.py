"""flan-engine: FLAN instruction tuning from scratch (model, kernels, parallelism, data mixer, scorer)."""
from setuptools import find_packages, setup

setup(
    name="flan-engine",
    version="0.1.0",
    description="FLAN (Wei et al., ICLR 2022) instruction tuning, built from scratch",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*", "flan", "flan.*"]),
    install_requires=[
        "torch>=2.11,<2.14",
        "triton>=3.6,<3.7",
        "numpy>=1.26",
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        "tqdm>=4.66",
        "datasets>=5.2,<6",
        "matplotlib>=3.8",
        "sacrebleu>=2.4",
        "rouge-score>=0.1.2",
    ],
    extras_require={"test": ["pytest>=8", "hypothesis>=6.100"]},
    entry_points={"console_scripts": ["flan=flan.cli:main"]},
)
