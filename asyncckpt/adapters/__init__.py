"""Adapters: other frameworks' checkpoint APIs on top of asyncckpt's writer.

Import the one you need, e.g. ``from asyncckpt.adapters.mindspore import ModelCheckpoint``; each
translates its framework's configuration into asyncckpt's policies rather than re-implementing
them.
"""
