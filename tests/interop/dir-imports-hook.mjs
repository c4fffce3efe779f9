// The resolve hook registered by dir-imports.mjs (module.register runs it off the main thread).
export async function resolve(specifier, context, next) {
  try {
    return await next(specifier, context)
  } catch (err) {
    const relative = specifier.startsWith('./') || specifier.startsWith('../')
    if (!relative || !['ERR_UNSUPPORTED_DIR_IMPORT', 'ERR_MODULE_NOT_FOUND'].includes(err.code)) {
      throw err
    }
    for (const candidate of [`${specifier}/index.js`, `${specifier}.js`]) {
      try {
        return await next(candidate, context)
      } catch (_again) {
        // try the next shape
      }
    }
    throw err
  }
}
