"""preble-hpc: Preble's E2 prefix-aware scheduling over real vLLM engines, as one MPI job."""

__version__ = "0.1.0"
