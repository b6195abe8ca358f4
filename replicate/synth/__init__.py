"""Generators that write each competition's exact on-disk format from synthetic but physically motivated
audio."""
