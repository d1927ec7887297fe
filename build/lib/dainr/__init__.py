"""DA-INR: dynamic-aware implicit neural representation for radial dynamic MRI.

Tensors in, images out; this package never touches ISMRMRD, Gadgetron or sockets.
"""
from .config import DAINRConfig, GridConfig
from .data import RadialData
from .recon import FitProgress, ReconResult, reconstruct, upsample_bilinear, zero_filled

__version__ = "0.1.0"
__all__ = ["DAINRConfig", "GridConfig", "RadialData", "FitProgress", "ReconResult", "reconstruct", "zero_filled",
           "upsample_bilinear", "__version__"]
