"""Selection methods: which positions of each weight are trained, and when that changes."""
