/** A mistake in how the program was started (flags, environment, config file): the CLI prints it and exits 2. */
export class UsageError extends Error {}
