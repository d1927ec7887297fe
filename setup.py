"""DA-INR dynamic MRI reconstruction as a Gadgetron-style streaming plug-in."""
import glob

from setuptools import find_packages, setup

setup(
    name="dainr",
    version="0.1.0",
    description="DA-INR (MICCAI 2025) dynamic radial MRI reconstruction: library, CLI and Gadgetron gadget",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["dainr", "dainr.*", "dainr_app", "dainr_app.*", "gadgets", "gadgets.*"]),
    install_requires=[
        # torch is installed first by scripts/bootstrap.sh (CPU wheel 2.13.0 without a GPU, CUDA build with one);
        # the floor here then installs nothing more.
        "torch>=2.4",  # dainr.optim runs torch._fused_adamw_, which has a CPU kernel from 2.4
        "torchkbnufft>=1.4",
        "numpy>=2.0",
        "scipy>=1.13",  # the floors of scipy, scikit-image, h5py and finufft: the first built against numpy 2
        "scikit-image>=0.24",
        "h5py>=3.11",
        "ismrmrd>=1.15",
        "defusedxml>=0.7.1",  # 0.7.0 raised its own ParseError, not ElementTree's: malformed XML reached clients raw
        "gadgetron>=1.4.1",  # the external-gadget runtime (python -m gadgetron PORT MODULE TARGET)
        "pillow>=9.1",  # scikit-image 0.24 needs it
        "pydicom>=3.0.1",  # dcmwrite(enforce_file_format=); 3.0.0 fetches example files over the network at import
        "tqdm>=4.60",
    ],
    extras_require={
        "fast": ["finufft>=2.3"],  # CPU NUFFT ~10x faster than torchkbnufft, ~4x than gather (README)
        "test": ["pytest>=7", "finufft>=2.3"],
        # tinycudann is not on PyPI: pip install git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch
    },
    entry_points={"console_scripts": ["dainr=dainr_app.cli:main"]},
    # the pipelines `dainr serve` resolves CONFIG_FILE names in (dainr_app.pipeline.PIPELINES_DIR)
    data_files=[("share/dainr/pipelines", sorted(glob.glob("pipelines/*.xml")))],
)
