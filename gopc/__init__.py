"""gopc: Gradient Origin Predictive Coding models and the sweep service that stabilises GOPC-2."""
