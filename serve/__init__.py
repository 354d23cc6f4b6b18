"""The runtime: frame sources, engines (dense, static, dynamic), the fallback policy, outputs."""
