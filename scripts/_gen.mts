import { writeDataset } from './generate.ts';
const info = await writeDataset(process.argv[2], { patients: Number(process.argv[3]), seed: 42, forms: ['csv'] });
console.log(JSON.stringify(info.files), JSON.stringify(info.rows));
