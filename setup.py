"""Vector Universe: CLIP-style training on YouTube thumbnails, titles and tags.

torch is deliberately only a lower bound: the Makefile installs the CPU build that lies on
disk first, and nothing here may pull in a different torch (torchvision and open_clip are kept
out of the requirements for that reason: each drags a multi-GB CUDA build of torch along).
"""

from setuptools import find_packages, setup

CORE = [
    "torch>=2.3",
    "deepspeed>=0.14",
    # 5.25 made Hugging Face's `kernels` a requirement, and its import name is this repository's
    # `kernels` package (the Triton losses): transformers then imports ours and fails. See README,
    # "Hugging Face's kernels package".
    "transformers>=4.40,<5.25",
    "tokenizers>=0.15",
    "peft>=0.10",
    "webdataset>=0.2.86,<0.3",  # img2dataset 1.47 pins webdataset<0.3: stay on the 0.2.x API
    "pillow>=10",
    "numpy",
    "simplejpeg>=1.6",  # JPEG decode in the training workers: PIL's pixels, about half its CPU
    "pyyaml",
    "tqdm",
    "matplotlib",
    "braceexpand",
]
DATASET_TOOLS = [
    "img2dataset>=1.45",
    "pandas",
    "pyarrow",
    "imagehash",
]
KERNELS = ["triton>=3.0; platform_system == 'Linux'"]
# ruff pinned: `make lint` must not change under us. pytest-xdist: `make test` runs two workers.
TEST = ["pytest>=8", "pytest-timeout", "pytest-xdist>=3.5", "ruff==0.17.5"]
# `python -m vutrain.bench --compare open_clip`. open_clip_torch depends on torchvision, which
# drags in its own torch build: beside an existing torch install it with
# `pip install -c torch-constraint.txt --no-deps open_clip_torch` (what `make venv` does); the
# benchmark then loads only the open_clip modules it needs when torchvision is absent.
BENCH = ["open_clip_torch>=3.0"]

setup(
    name="vutrain",
    version="0.1.0",
    description="DeepSpeed ZeRO CLIP trainer for YouTube thumbnails, titles and tags",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(
        include=["vutrain", "vutrain.*", "kernels", "kernels.*", "dataset_tools", "dataset_tools.*"]
    ),
    package_data={"vutrain": ["configs/*.yaml"]},
    python_requires=">=3.11",
    entry_points={
        "console_scripts": [
            "vutrain-train=vutrain.train:main",
            "vutrain-export=vutrain.export:main",
            "vutrain-dataset=dataset_tools.__main__:run",
        ],
    },
    install_requires=CORE,
    extras_require={
        "data": DATASET_TOOLS,
        "kernels": KERNELS,
        "test": DATASET_TOOLS + KERNELS + TEST,
        "bench": BENCH,
        "dev": DATASET_TOOLS + KERNELS + TEST + ["tensorboard"],
    },
)
