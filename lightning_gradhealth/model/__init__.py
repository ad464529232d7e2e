"""What is watched, and over which process groups.

Which parameters form which layers (`layout`), the watched set (`watch`), what the model is made of (`inventory`,
`detect`), which process groups statistics are combined over (`distributed`, `stages`) and how sharded units (rows)
are put together for the clippers (`shards`).
"""
