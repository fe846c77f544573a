"""Readers for BU-3DFE, Bosphorus and the synthetic ICT-FaceKit set."""
