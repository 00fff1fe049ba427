"""tristage: disaggregated encode / prefill / decode serving."""
