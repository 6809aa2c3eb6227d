"""Exact linear assignment in JAX: the shortest-augmenting-path Hungarian method with lax loops.

``solve_assignment(cost)`` returns the column assigned to each row of a square cost matrix, minimising the
total cost exactly (up to floating-point ties). It runs under ``jax.jit`` and ``jax.vmap``: one row is added
per outer iteration (``fori_loop``), and each Dijkstra step over the reduced costs is a vectorised update of
all columns (``while_loop``), so a problem of size n takes at most n(n+1)/2 vectorised steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def solve_assignment(cost: jax.Array) -> jax.Array:
    """Exact minimum-cost perfect matching of a square matrix.

    Args:
      cost: ``[n, n]`` float costs (finite).

    Returns: ``[n]`` int32, ``col[i]`` = the column matched to row ``i``; ``cost[i, col[i]]`` sums to the minimum.
    """
    cost = jnp.asarray(cost)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"solve_assignment needs a square [n, n] cost matrix, got shape {cost.shape}")
    n = cost.shape[0]
    dtype = jnp.promote_types(cost.dtype, jnp.float32)
    inf = jnp.array(jnp.inf, dtype)
    # 1-based rows and columns; row 0 / column 0 are the virtual start of every augmenting path.
    padded = jnp.zeros((n + 1, n + 1), dtype).at[1:, 1:].set(cost.astype(dtype))
    columns = jnp.arange(n + 1)

    def add_row(row, state):
        row_pot, col_pot, row_of_col, came_from = state
        row_of_col = row_of_col.at[0].set(row)
        min_slack = jnp.full((n + 1,), inf)
        visited = jnp.zeros((n + 1,), bool)

        def not_free(search):
            col = search[-1]
            return search[2][col] != 0

        def dijkstra_step(search):
            row_pot, col_pot, row_of_col, came_from, min_slack, visited, col = search
            visited = visited.at[col].set(True)
            current_row = row_of_col[col]
            reduced = padded[current_row] - row_pot[current_row] - col_pot
            improves = (~visited) & (reduced < min_slack) & (columns > 0)
            min_slack = jnp.where(improves, reduced, min_slack)
            came_from = jnp.where(improves, col, came_from)
            open_slack = jnp.where(visited | (columns == 0), inf, min_slack)
            next_col = jnp.argmin(open_slack)
            delta = open_slack[next_col]
            row_pot = row_pot.at[row_of_col].add(jnp.where(visited, delta, 0.0))
            col_pot = jnp.where(visited, col_pot - delta, col_pot)
            min_slack = jnp.where(visited, min_slack, min_slack - delta)
            return row_pot, col_pot, row_of_col, came_from, min_slack, visited, next_col

        search = (row_pot, col_pot, row_of_col, came_from, min_slack, visited, jnp.array(0))
        row_pot, col_pot, row_of_col, came_from, _, _, free_col = jax.lax.while_loop(not_free, dijkstra_step, search)

        def augment(path):
            row_of_col, col = path
            previous = came_from[col]
            return row_of_col.at[col].set(row_of_col[previous]), previous

        row_of_col, _ = jax.lax.while_loop(lambda path: path[1] != 0, augment, (row_of_col, free_col))
        return row_pot, col_pot, row_of_col, came_from

    state = (
        jnp.zeros((n + 1,), dtype),
        jnp.zeros((n + 1,), dtype),
        jnp.zeros((n + 1,), jnp.int32),
        jnp.zeros((n + 1,), jnp.int32),
    )
    _, _, row_of_col, _ = jax.lax.fori_loop(1, n + 1, add_row, state)
    col_of_row = jnp.zeros((n,), jnp.int32).at[row_of_col[1:] - 1].set(jnp.arange(n, dtype=jnp.int32))
    return col_of_row
