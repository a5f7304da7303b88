// gemm: to be written
