"""meshmq.discovery"""
