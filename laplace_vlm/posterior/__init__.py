"""Gaussian posteriors over the projection heads: Kronecker forms and prior tuning."""
