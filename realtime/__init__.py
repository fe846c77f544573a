"""The runtime: capture -> landmarks -> canonical maps -> engine -> ZeroMQ publisher.

Nothing in this package imports torch: the runtime needs only an exported model file.
"""
