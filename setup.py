"""flan-engine: FLAN instruction tuning from scratch (model, kernels, parallelism, data mixer, scorer)."""
from setuptools import find_packages, setup

setup(
    name="flan-engine",
    version="0.1.0",
    description="FLAN (Wei et al., ICLR 2022) instruction tuning, built from scratch",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*", "flan", "flan.*"])
    + ["flan.template_files"],
    # The data files a command reads, shipped in the wheel: the task registry beside its code, and the repo's
    # templates/ folder as flan/template_files (flan/templates.py looks there first). scripts/check_wheel.sh
    # checks that an installed wheel runs `flan data tasks` from any folder.
    package_dir={"flan.template_files": "templates"},
    package_data={"flan": ["tasks/*.toml"], "flan.template_files": ["*.toml"]},
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
