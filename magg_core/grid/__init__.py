"""Stage *grid*: plan the cells of a run, grid one parent cell end to end (read → aggregate
→ write → record), and assemble the coarse levels after every cell.
"""
