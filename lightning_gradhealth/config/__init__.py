"""What the user configures; imports only `schema`.

Options (`options`), thresholds (`thresholds`), argument checks (`validation`) and the logging schedule (`cadence`).
"""
