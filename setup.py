"""boldjax: a JAX/Flax training stack for fMRI foundation models."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
REQUIREMENTS = [
  line.strip()
  for line in (HERE / "requirements.txt").read_text().splitlines()
  if line.strip() and not line.startswith("#")
]

setup(
  name="boldjax",
  version="0.1.0",
  description="JAX/Flax training stack for fMRI foundation models",
  long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
  long_description_content_type="text/markdown",
  # configs/ and launch/ stay in the repository (run from its root): experiment files to copy
  # and edit, not modules to import; installing them would claim the top-level names
  # `configs` and `launch` in site-packages.
  packages=find_packages(include=["boldjax", "boldjax.*"]),
  python_requires=">=3.11",
  install_requires=REQUIREMENTS,
  extras_require={
    "test": [
      "pytest==9.0.3",
      "pytest-xdist==3.8.0",  # the suite runs on 2 workers (pytest.ini): CI's 2 cores
      "hypothesis==6.155.2",
      "ruff==0.17.6",
      "nbformat==5.11.1",
      "nbclient==0.11.0",
      "ipykernel==7.4.0",
      "portpicker==1.6.0",
      # the torch-reference tests (benchmarks' PyTorch re-implementations, fixtures' pickles);
      # 2.13.0 is a CPU build served from this machine's disk
      "torch==2.13.0",
      # the live diffusers AutoencoderKL reference (VAE variants the fixtures do not cover)
      "diffusers==0.42.1",
      # gs:// workdirs tested offline against a local GCS emulator
      "gcsfs==2026.10.1",
      "gcp-storage-emulator==2026.7.19",
    ],
    "gcs": ["gcsfs==2026.10.1"],  # gs:// workdirs and data paths (etils.epath's backend)
    "bench": ["torch==2.13.0", "diffusers==0.42.1"],
  },
)
