"""Public GPU kernel measurements turned into moesim results files (torch-free).

:mod:`moesim.gpudata.aiconfigurator` reads NVIDIA's measured kernel tables
shipped in the ``aiconfigurator-core`` package (``pip install moesim[gpu-data]``)
and writes them in the ``moesim bench`` results schema with provenance columns.
"""
