import re

from setuptools import find_packages, setup

setup(
    name="wuerstchen-engine",
    version=re.search(r'__version__ = "(.+)"', open("engine/__init__.py", encoding="utf-8").read())[1],
    description="A fast inference engine for Würstchen v2 text-to-image",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "export", "export.*", "kernels", "kernels.*",
                                    "benchmarks", "benchmarks.*"]),
    # Ranges that both torch 2.13 (CPU, CI) and the GPU image (torch 2.11, transformers 5.17) satisfy.
    # Install torch first: on a machine without it, this requirement pulls a multi-GB CUDA build.
    install_requires=[
        "torch>=2.4,<3",
        "transformers>=5.0,<6",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "numpy>=1.24",
        "pillow>=10",
        "tqdm>=4.60",
    ],
    extras_require={
        # diffusers is the numerical oracle of the tests, never a runtime dependency. The kernel tests run in
        # Triton's interpreter, which needs 3.8: 3.6's fails under NumPy 2.4 on loops to a runtime bound, 3.7's
        # drops the sign of what rounds to zero in fp8 (the GPU image's 3.6 compiles every kernel for sm_90 and
        # sm_89: tests/test_kernels_compile.py passes with it).
        "test": ["pytest>=8", "hypothesis>=6", "diffusers==0.42.1", "onnx>=1.16", "onnxscript>=0.3",
                 "onnxruntime>=1.18", "polygraphy>=0.49", "onnx-graphsurgeon>=0.6", "triton>=3.8", "matplotlib>=3.7",
                 # the quality report's SSIM is checked against torchmetrics'
                 "torchmetrics>=1.0",
                 # the server's tests: the service, an OpenAI client against it, and two replicas on Ray Serve
                 "fastapi>=0.110", "uvicorn>=0.29", "httpx>=0.27", "prometheus_client>=0.20", "openai>=1.30",
                 "ray[serve]>=2.60,<3"],
        "bench": ["diffusers==0.42.1", "matplotlib>=3.7"],
        "onnx": ["onnx>=1.16", "onnxscript>=0.3", "onnxruntime>=1.18", "polygraphy>=0.49", "onnx-graphsurgeon>=0.6"],
        # tensorrt comes from NVIDIA's index (https://pypi.nvidia.com); polygraphy 0.53 reads TensorRT 11 plans.
        "tensorrt": ["tensorrt>=10.1", "polygraphy>=0.53"],
        "gpu": ["onnxruntime-gpu>=1.18"],
        # `wuerstchen serve` (httpx is also the HTTP client of `wuerstchen bench --load --url`).
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "prometheus_client>=0.20", "httpx>=0.27"],
        # `wuerstchen serve --ray`: 2.60 brought BackpressureConfig (429 on a full queue) and late-bound ingress apps.
        "ray": ["fastapi>=0.110", "uvicorn>=0.29", "prometheus_client>=0.20", "httpx>=0.27", "ray[serve]>=2.60,<3"],
    },
    entry_points={
        "console_scripts": ["wuerstchen=engine.cli:main"],
        # Subcommands of the layers above the runtime, which `engine.cli` finds here without importing them.
        "wuerstchen.commands": ["export = export.cli:add_export", "build = export.cli:add_build",
                                "bench = benchmarks.cli:add_parser", "serve = engine.serving:add_parser"],
        # The engine builder that the TensorRT runtime uses when asked to build missing engines on load.
        "wuerstchen.builders": ["tensorrt = export.tensorrt:build_engines"],
    },
)
