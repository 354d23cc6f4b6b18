"""dynprune: dynamic per-frame channel pruning for real-time one-class detection.

Gate modules (ManiDP, Tang et al. CVPR 2021) predict a saliency for every hidden
channel of a detector from the frame itself; the runtime computes only the kept
channels. A static EFFP-pruned engine (Ko, Kang, Kim, AICAS 2024) is the fallback.
"""

__version__ = "0.1.0"
