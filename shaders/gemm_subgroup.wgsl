// gemm_subgroup: to be written
