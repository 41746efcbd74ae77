"""Thin KFP components, one per stage (see DESIGN.md): each unpacks its inputs and calls kat_core.

Import a component from its module (`from components.synthesize import synthesize`): this package itself
imports nothing, because the component bodies import `components.runtime` at run time, where KFP's
executor exposes only part of `kfp.dsl` (no `dsl.component`)."""
