// upsample: to be written
