"""Where the arithmetic runs: device, precision, compile, random-number state, and the linear layer's CPU kernel."""
