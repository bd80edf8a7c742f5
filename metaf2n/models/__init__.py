"""Networks of MetaF2N: the RRDBNet generator, the U-Net discriminator and MaskNet."""

from metaf2n.models.checkpoint import extract_state_dict, load_pretrained
from metaf2n.models.discriminator import UNetDiscriminatorSN
from metaf2n.models.masknet import MaskNet
from metaf2n.models.rrdbnet import RRDBNet

__all__ = ["RRDBNet", "UNetDiscriminatorSN", "MaskNet", "load_pretrained", "extract_state_dict"]
