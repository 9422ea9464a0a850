"""SCUF (Wang et al., ICCV 2025): SD-Turbo in one step as a lightener, steered by 1 - V."""
