"""Core: the UNet encoder/decoder split, the FCR loss and the (cached) samplers. Imports nothing else of fcr."""
