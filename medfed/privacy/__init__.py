"""Privacy you can prove: DP (client-level and DP-SGD) with accounting, CKKS aggregation, audits."""
